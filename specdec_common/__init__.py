"""What the service, the sidecar and the clients share: logging set-up, names derived from the
proto descriptors, and settings (a flag that overrides an environment variable).

Imports only the standard library, structlog and the generated stubs (no torch), so the
sidecar installs and starts without the service's dependencies.
"""
