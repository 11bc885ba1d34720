"""Running more than one replica: the registry kept in step with a shared store (sync.py), and the
Ray Serve deployment that routes requests by adapter (serve_ray.py)."""
