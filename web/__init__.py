"""The review and operations web app served by the node (see docs/web.md)."""
