"""SMCA-DETR modeling."""
