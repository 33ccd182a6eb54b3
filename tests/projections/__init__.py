"""Projections (projections/): the catalog fold, the projection runner, arrow type rules."""
