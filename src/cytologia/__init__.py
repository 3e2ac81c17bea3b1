"""cytologia: detect and classify white blood cells on blood-smear images (Cytologia challenge)."""

from cytologia import offline as _offline  # noqa: F401  (sets offline env vars before heavy imports)

__version__ = "0.1.0"
