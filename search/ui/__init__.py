"""What users read: the terminal's progress bar and trial lines (`progress`), and the study read
back as the notes' table and one HTML report (`report`). optuna-dashboard, served with a private
name of its own replaced, is `search.optuna_seam.dashboard`."""
