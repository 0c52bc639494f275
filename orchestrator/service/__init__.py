"""The use cases: every user-facing operation once, checked, written through the store, turned into views."""
