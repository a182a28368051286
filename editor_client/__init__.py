"""Editor-side code: what talks to a ghostpen server on behalf of an editor."""
