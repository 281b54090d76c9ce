"""Placeholder replaced below."""
def comm_per_token(*a, **k):
    raise NotImplementedError
