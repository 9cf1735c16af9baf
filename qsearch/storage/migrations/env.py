"""Alembic environment: runs on the connection that ``qsearch.storage.db`` hands over.

The version table is ``qsearch_schema_version`` so that Optuna's own ``alembic_version`` in the same
database is never touched; batch mode lets SQLite alter tables.
"""

from alembic import context

from qsearch.storage.schema import VERSION_TABLE, Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
    include_name=lambda name, type_, parent: type_ != "table" or name.startswith("qsearch_"),
)
with context.begin_transaction():
    context.run_migrations()
