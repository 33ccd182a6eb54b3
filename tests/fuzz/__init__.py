"""OpenAPI fuzzing (schemathesis) of a real ``ledgerlake serve``: every documented
operation, as the platform admin and as a reader, against 5xx, schema drift and refused
requests that change something."""
