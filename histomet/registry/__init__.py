"""Model registry: version bundles, an MLflow-backed store, aliases, audit and publishing.

Needs the ``registry`` extra (MLflow) for the store; version bundles need only
ONNX Runtime.
"""
