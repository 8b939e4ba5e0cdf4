"""Model files shipped with the package (see manifest.json for source, license and sha256)."""
