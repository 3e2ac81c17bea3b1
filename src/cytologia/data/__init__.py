"""The data contract: tables, images, hygiene, folds and the synthetic generator."""
