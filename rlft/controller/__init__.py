"""Controllers: one readable function per algorithm, phases named and timed."""
