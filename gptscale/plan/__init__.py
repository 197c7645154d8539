"""Planning: what a layout costs per rank before (and while) it runs."""
