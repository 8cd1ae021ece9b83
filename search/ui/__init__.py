"""What users read: the terminal's progress bar and trial lines (`progress`), the study read
back as the notes' table and one HTML report (`report`), and optuna-dashboard as `search
dashboard` serves it (`dashboard`)."""
