"""Generated from protos/ by protos/gen_protos.py: do not edit."""
