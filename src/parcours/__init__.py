"""Parcours: territorial e-health and telehealth platform, FHIR-native on PostgreSQL."""

__version__ = "0.1.0"
