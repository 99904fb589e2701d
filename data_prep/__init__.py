"""Preference-data preparation (see the README); grows with the reward/DPO stages."""
