"""Access control (app/access): principals and tokens, JWT, policies, the authorization matrices."""
