"""The .proto contracts (proctoring.v1) and, generated from them at build time, their Python modules."""
