"""disburser: pay a signed allocation manifest out in an ERC-20 token, crash-safely."""

__version__ = "0.1.0"
