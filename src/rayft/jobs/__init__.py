"""Submitting rayft jobs to a Ray cluster through Ray's job system."""
