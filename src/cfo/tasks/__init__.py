"""Tasks: concrete models, rewards and constraints built on the core (the core never imports them)."""
