"""The HTTP routes, one module per resource: catalog, ingest, changes, policies, query,
events (the audit trail), principals (and tokens, grants, roles) and health.

Route modules parse and authorize, then call the services (``app.services``); they may
import ``app.api``'s guards, params and schemas, ``app.access``, ``app.write`` and the
layers below, never each other.
"""

from typing import Any

from litestar import Router
from litestar.di import Provide

from app.api.guards import provide_services, require_token
from app.api.routes.catalog import (
    describe_table,
    describe_version,
    drop_table,
    list_orgs,
    list_supers,
    list_tables,
    set_mirrors,
    super_meta,
    table_history,
)
from app.api.routes.changes import compact_table, delete_rows, restore_table
from app.api.routes.events import follow_events, list_events, read_audit
from app.api.routes.health import effective_config, health, metrics, service_info
from app.api.routes.ingest import ingest_rows
from app.api.routes.policies import set_policies
from app.api.routes.principals import ADMIN_HANDLERS
from app.api.routes.query import run_query, validate_query

V1_HANDLERS = [ingest_rows, delete_rows, restore_table, compact_table, describe_version,
               list_orgs, list_supers, list_tables, describe_table, drop_table, set_mirrors,
               set_policies,
               table_history,
               run_query, validate_query, super_meta, service_info,
               list_events, follow_events, read_audit, effective_config]  # fmt: skip
V1 = Router(path="/", route_handlers=[*V1_HANDLERS, *ADMIN_HANDLERS], guards=[require_token])
ROUTES: list[Any] = [health, metrics, V1]
DEPENDENCIES = {"services": Provide(provide_services, sync_to_thread=False)}
