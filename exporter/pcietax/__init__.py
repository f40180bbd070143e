"""pcietax: measure the PCIe tax of GPU inference nodes (bytes moved per useful payload byte)."""

__version__ = "0.1.0"
