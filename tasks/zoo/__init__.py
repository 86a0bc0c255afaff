"""The model zoo: clean and backdoored models with truth records, the scanner's benchmark."""
