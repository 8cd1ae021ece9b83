"""What users read: the terminal's progress bar and trial lines (`progress`), and the study read
back as the notes' table and one HTML report (`report`)."""
