"""Third-party code shipped inside mupsweep (each package keeps its own license file)."""
