"""nftbench's runner: victims, single runs, records, the CLI and benchmark presets."""
