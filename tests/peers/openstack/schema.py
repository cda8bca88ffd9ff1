"""Creates Neutron's schema from its models (alembic cannot migrate SQLite;
Neutron's own unit tests do the same).

Usage: schema.py sqlite:////path/neutron.db
"""
import sys

import sqlalchemy as sa
from neutron.db.migration.models import head

engine = sa.create_engine(sys.argv[1])
head.get_metadata().create_all(engine)
