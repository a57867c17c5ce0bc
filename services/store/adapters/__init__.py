"""Database side of the store: SQLAlchemy models, engines, repository, migrations."""
