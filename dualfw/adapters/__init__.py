"""Model families behind `dualfw.core.interface.LMMAdapter`: Janus / Janus-Pro, and tiny offline
builders for tests and laptops."""
