"""Models written the way a user outside this project would write them (not part of ``edgeprune``).

They exercise "bring your own model" pruning: nothing here registers anything with edgeprune.
"""
