"""festina's database: what the head-node daemon must not hold only in memory, and energy accounting.

``models`` declares the tables (SQLAlchemy 2, typed), ``migrations`` (Alembic,
shipped in the package) creates and evolves them, ``engine`` turns a URL into a
configured engine (SQLite with WAL and foreign keys, or PostgreSQL through
psycopg 3), ``migrate`` runs Alembic without an ``alembic.ini`` and ``store``
is the small repository the daemon writes through and rebuilds its view from
on restart. SQLite is the default; nothing here requires PostgreSQL.
"""
