"""`ghostpen eval`: completion quality on real code, each component measured on its own."""
