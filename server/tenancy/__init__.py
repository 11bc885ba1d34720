"""Who is calling: tenants, roles, API keys, and the per-tenant limits on what they may hold and run."""
