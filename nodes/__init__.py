"""The node library (installed as ``rlflow.nodes``): one module per node kind."""
