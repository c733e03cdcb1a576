"""Training methods: a model plus the objective that trains it, plugged into the one trainer."""
