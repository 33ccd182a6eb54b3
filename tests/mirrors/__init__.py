"""The Delta and Iceberg mirrors (mirrors/): runners, faults, API and independent readers."""
