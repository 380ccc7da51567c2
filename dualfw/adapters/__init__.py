"""Model families behind `dualfw.core.interface.LMMAdapter`: Janus / Janus-Pro, Emu3, and tiny offline
builders for tests and laptops."""
