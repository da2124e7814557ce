"""Objectives as pure functions of tensors: no models, data loaders or files in here."""
