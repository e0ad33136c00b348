"""Model supply chain: ModelPack OCI artifacts, registry push/pull, OpenSSF model signing, the load gate,
SLSA provenance and CycloneDX ML-BOM. Entry points for the engine: `resolve.resolve_model_ref` and
`gate.verify_before_load`."""
