"""The package version (its own module, so that acip.core can read it without importing acip)."""
__version__ = "0.2.0"
