"""Flower 1.41 workarounds, quarantined: the one place fedhosp touches Flower beyond its public API.

(The full inventory, with the gate and switch, is written in the next commit.)
"""
