"""Building blocks shared by the methods' networks, one file per block."""
