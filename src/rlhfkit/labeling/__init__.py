"""Human preference collection: a labeling store, AI judges, agreement and export."""
