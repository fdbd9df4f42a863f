"""Scale-out on Ray Serve (`arborlm serve --replicas N`, the `cluster` extra). Only
`prefix_table.py` works without Ray; nothing on the single-server path imports this package."""
