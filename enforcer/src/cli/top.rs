//! `enforcer top`: routers and rules with their packet rates, drops and
//! revocations, refreshed every second. It reads the pinned maps, like
//! `maps dump`, so it works while the daemon is down (and says so).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Result;
use enforcer::{
    api::{Dump, SlotEntry},
    kernel::dump,
};
use ratatui::{
    DefaultTerminal, Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph, Row, Table, TableState},
};

const REFRESH: Duration = Duration::from_secs(1);

/// A rule slot's counters at one reading and its rates since the last.
#[derive(Debug, Clone, PartialEq)]
struct RuleRow {
    slot: SlotEntry,
    tagged_rate: f64,
    dropped_rate: f64,
}

/// A router's rules summed.
#[derive(Debug, Clone, Default, PartialEq)]
struct RouterRow {
    router: String,
    live: usize,
    revoked: usize,
    tagged_rate: f64,
    dropped_rate: f64,
    tagged: u64,
    dropped: u64,
}

/// Per-second rate of a counter between two readings; a counter that went
/// down (its slot was reused) starts again from zero.
fn rate(before: Option<u64>, now: u64, elapsed: Duration) -> f64 {
    match before {
        Some(b) if now >= b && !elapsed.is_zero() => (now - b) as f64 / elapsed.as_secs_f64(),
        _ => 0.0,
    }
}

fn router_name(s: &SlotEntry) -> String {
    s.router_id.clone().unwrap_or_else(|| format!("index {}", s.router_index))
}

/// The rows of a reading, with rates against the previous one.
fn rows(previous: Option<&(Instant, Dump)>, now: (Instant, &Dump)) -> (Vec<RouterRow>, Vec<RuleRow>) {
    let before: BTreeMap<(u32, u32), (u64, u64)> =
        previous.map(|(_, d)| d.slots.iter().map(|s| ((s.router_index, s.slot), (s.tagged, s.dropped))).collect()).unwrap_or_default();
    let elapsed = previous.map(|(at, _)| now.0.duration_since(*at)).unwrap_or_default();
    let rules: Vec<RuleRow> = now
        .1
        .slots
        .iter()
        .map(|s| {
            let b = before.get(&(s.router_index, s.slot));
            RuleRow { tagged_rate: rate(b.map(|b| b.0), s.tagged, elapsed), dropped_rate: rate(b.map(|b| b.1), s.dropped, elapsed), slot: s.clone() }
        })
        .collect();
    let mut routers: BTreeMap<String, RouterRow> = BTreeMap::new();
    for r in &rules {
        let name = router_name(&r.slot);
        let row = routers.entry(name.clone()).or_insert_with(|| RouterRow { router: name, ..Default::default() });
        if r.slot.state == "live" {
            row.live += 1;
        } else {
            row.revoked += 1;
        }
        row.tagged_rate += r.tagged_rate;
        row.dropped_rate += r.dropped_rate;
        row.tagged += r.slot.tagged;
        row.dropped += r.slot.dropped;
    }
    (routers.into_values().collect(), rules)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Sort {
    Tagged,
    Dropped,
    Name,
}

impl Sort {
    fn next(self) -> Self {
        match self {
            Sort::Tagged => Sort::Dropped,
            Sort::Dropped => Sort::Name,
            Sort::Name => Sort::Tagged,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sort::Tagged => "tagged/s",
            Sort::Dropped => "dropped/s",
            Sort::Name => "router",
        }
    }
}

fn sort_routers(rows: &mut [RouterRow], by: Sort) {
    match by {
        Sort::Tagged => rows.sort_by(|a, b| b.tagged_rate.total_cmp(&a.tagged_rate).then(b.tagged.cmp(&a.tagged)).then(a.router.cmp(&b.router))),
        Sort::Dropped => rows.sort_by(|a, b| b.dropped_rate.total_cmp(&a.dropped_rate).then(b.dropped.cmp(&a.dropped)).then(a.router.cmp(&b.router))),
        Sort::Name => rows.sort_by(|a, b| a.router.cmp(&b.router)),
    }
}

struct Top {
    bpffs: PathBuf,
    socket: PathBuf,
    last: Option<(Instant, Dump)>,
    routers: Vec<RouterRow>,
    rules: Vec<RuleRow>,
    error: Option<String>,
    daemon_up: bool,
    sort: Sort,
    /// Routers, or the rules of the selected router.
    rules_view: bool,
    table: TableState,
}

impl Top {
    fn refresh(&mut self) {
        self.daemon_up = std::os::unix::net::UnixStream::connect(&self.socket).is_ok();
        match dump::read(&self.bpffs) {
            Ok(d) => {
                let now = Instant::now();
                let (routers, rules) = rows(self.last.as_ref(), (now, &d));
                self.routers = routers;
                self.rules = rules;
                self.last = Some((now, d));
                self.error = None;
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
        sort_routers(&mut self.routers, self.sort);
        if self.table.selected().is_none() && !self.routers.is_empty() {
            self.table.select(Some(0));
        }
    }

    fn selected_router(&self) -> Option<&RouterRow> {
        self.routers.get(self.table.selected().unwrap_or(0))
    }

    /// Handles a key; false to quit.
    fn key(&mut self, code: KeyCode) -> bool {
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                sort_routers(&mut self.routers, self.sort);
            }
            KeyCode::Tab | KeyCode::Enter => self.rules_view = !self.rules_view,
            KeyCode::Down | KeyCode::Char('j') if !self.rules_view => self.table.select_next(),
            KeyCode::Up | KeyCode::Char('k') if !self.rules_view => self.table.select_previous(),
            _ => {}
        }
        true
    }

    fn draw(&mut self, frame: &mut Frame) {
        let [head, body, foot] = Layout::vertical([Constraint::Length(4), Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
        let live: usize = self.routers.iter().map(|r| r.live).sum();
        let revoked: usize = self.routers.iter().map(|r| r.revoked).sum();
        let tagged: f64 = self.routers.iter().map(|r| r.tagged_rate).sum();
        let dropped: f64 = self.routers.iter().map(|r| r.dropped_rate).sum();
        let daemon = if self.daemon_up { "daemon running" } else { "daemon DOWN (enforcement stays; maps read directly)" };
        let summary = match &self.error {
            Some(e) => format!("cannot read the maps: {e}"),
            None => format!("{} routers  {live} live rules  {revoked} revoked  {tagged:.0} tagged/s  {dropped:.0} dropped/s", self.routers.len()),
        };
        frame.render_widget(
            Paragraph::new(vec![Line::from(summary), Line::from(format!("{daemon}  bpffs {}", self.bpffs.display()))])
                .block(Block::bordered().title(" enforcer top ")),
            head,
        );
        let bold = Style::default().add_modifier(Modifier::BOLD);
        if self.rules_view {
            let router = self.selected_router().map(|r| r.router.clone()).unwrap_or_default();
            let rows = self.rules.iter().filter(|r| router_name(&r.slot) == router).map(|r| {
                let s = &r.slot;
                Row::new(vec![
                    s.slot.to_string(),
                    s.protocol.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    s.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    s.helper.clone().unwrap_or_else(|| "-".into()),
                    s.state.clone(),
                    format!("{:.0}", r.tagged_rate),
                    format!("{:.0}", r.dropped_rate),
                    s.tagged.to_string(),
                    s.dropped.to_string(),
                ])
            });
            let widths = [4, 5, 5, 10, 7, 9, 9, 12, 12].map(Constraint::Min);
            let table = Table::new(rows, widths)
                .header(Row::new(["SLOT", "PROTO", "PORT", "HELPER", "STATE", "TAGGED/S", "DROPPED/S", "TAGGED", "DROPPED"]).style(bold))
                .block(Block::bordered().title(format!(" rules of router {router} ")));
            frame.render_widget(table, body);
        } else {
            let rows = self.routers.iter().map(|r| {
                Row::new(vec![
                    r.router.clone(),
                    r.live.to_string(),
                    r.revoked.to_string(),
                    format!("{:.0}", r.tagged_rate),
                    format!("{:.0}", r.dropped_rate),
                    r.tagged.to_string(),
                    r.dropped.to_string(),
                ])
            });
            let widths = [Constraint::Length(36), Constraint::Min(5), Constraint::Min(7), Constraint::Min(9), Constraint::Min(9), Constraint::Min(12), Constraint::Min(12)];
            let table = Table::new(rows, widths)
                .header(Row::new(["ROUTER", "RULES", "REVOKED", "TAGGED/S", "DROPPED/S", "TAGGED", "DROPPED"]).style(bold))
                .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
                .block(Block::bordered().title(format!(" routers, by {} ", self.sort.label())));
            frame.render_stateful_widget(table, body, &mut self.table);
        }
        let keys = if self.rules_view { "q quit  tab back to routers" } else { "q quit  s sort  up/down select  tab rules of the selected router" };
        frame.render_widget(Paragraph::new(keys), foot);
    }

    fn run(&mut self, terminal: &mut DefaultTerminal) -> Result<()> {
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                self.refresh();
                next = Instant::now() + REFRESH;
            }
            terminal.draw(|f| self.draw(f))?;
            if event::poll(next.saturating_duration_since(Instant::now()))?
                && let Event::Key(k) = event::read()?
                && k.kind == KeyEventKind::Press
                && !self.key(k.code)
            {
                return Ok(());
            }
        }
    }
}

pub fn run(bpffs: &Path, socket: &Path) -> Result<()> {
    // The maps must be readable before the screen is taken over.
    dump::read(bpffs)?;
    let mut top = Top {
        bpffs: bpffs.to_path_buf(),
        socket: socket.to_path_buf(),
        last: None,
        routers: Vec::new(),
        rules: Vec::new(),
        error: None,
        daemon_up: false,
        sort: Sort::Tagged,
        rules_view: false,
        table: TableState::default(),
    };
    ratatui::run(|terminal| top.run(terminal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(router: &str, slot: u32, state: &str, tagged: u64, dropped: u64) -> SlotEntry {
        SlotEntry {
            router_id: Some(router.into()),
            router_index: router.len() as u32,
            slot,
            protocol: None,
            port: None,
            helper: None,
            state: state.into(),
            tagged,
            dropped,
        }
    }

    fn dump(slots: Vec<SlotEntry>) -> Dump {
        Dump { bpffs: String::new(), routers: 0, slots }
    }

    #[test]
    fn rates_come_from_two_readings_and_a_reused_slot_starts_from_zero() {
        let t0 = Instant::now();
        let first = dump(vec![slot("a", 1, "live", 100, 0), slot("a", 2, "revoked", 0, 50), slot("bb", 1, "live", 1000, 0)]);
        let (routers, _) = rows(None, (t0, &first));
        assert!(routers.iter().all(|r| r.tagged_rate == 0.0), "no rate from one reading");
        let second = dump(vec![slot("a", 1, "live", 300, 0), slot("a", 2, "revoked", 0, 150), slot("bb", 1, "live", 10, 0)]);
        let (routers, rules) = rows(Some(&(t0, first)), (t0 + Duration::from_secs(2), &second));
        let a = routers.iter().find(|r| r.router == "a").unwrap();
        assert_eq!((a.live, a.revoked, a.tagged_rate, a.dropped_rate, a.tagged, a.dropped), (1, 1, 100.0, 50.0, 300, 150));
        let bb = routers.iter().find(|r| r.router == "bb").unwrap();
        assert_eq!(bb.tagged_rate, 0.0, "counter went down: slot reused");
        assert_eq!(rules.len(), 3);
    }

    #[test]
    fn sorting_puts_the_busiest_or_the_dropping_first() {
        let row = |router: &str, t: f64, d: f64| RouterRow { router: router.into(), tagged_rate: t, dropped_rate: d, ..Default::default() };
        let mut rows = vec![row("b", 1.0, 9.0), row("a", 5.0, 0.0), row("c", 3.0, 3.0)];
        sort_routers(&mut rows, Sort::Tagged);
        assert_eq!(rows.iter().map(|r| r.router.as_str()).collect::<Vec<_>>(), ["a", "c", "b"]);
        sort_routers(&mut rows, Sort::Dropped);
        assert_eq!(rows[0].router, "b");
        sort_routers(&mut rows, Sort::Name);
        assert_eq!(rows[0].router, "a");
    }
}
