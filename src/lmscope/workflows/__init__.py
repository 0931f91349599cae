"""Workflows: multi-stage jobs built from the layers below (the resumable stage `pipeline`, the `demo`)."""
