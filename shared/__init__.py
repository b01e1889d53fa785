"""What the Llamaship services share: config, store, Redis keys, stubs, errors, telemetry.

Nothing here imports a service package.
"""
