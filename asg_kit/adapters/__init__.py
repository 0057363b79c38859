"""One adapter per unified backbone behind one protocol (``base.UnifiedBackbone``)."""
