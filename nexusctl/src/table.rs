//! Plain aligned columns for people (scripts use --json).

/// `rows` under `header`, each column as wide as its widest cell; state
/// columns in colour where stdout takes it.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    render_with(header, rows, crate::ui::colors())
}

/// Columns whose cells are painted by meaning.
const PAINTED: [&str; 3] = ["STATE", "OUTCOME", "GUEST"];

pub fn render_with(header: &[&str], rows: &[Vec<String>], colors: bool) -> String {
    // What nexusd says is shown, never obeyed: no control characters.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .take(header.len())
                .map(|cell| {
                    cell.chars()
                        .map(|c| if c.is_control() { ' ' } else { c })
                        .collect()
                })
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>, paint: bool| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            // Widths count the text; colour codes go around it.
            let pad = widths[i] - cell.chars().count();
            if paint && header.get(i).is_some_and(|h| PAINTED.contains(h)) {
                out.push_str(&crate::ui::paint_state(cell));
            } else {
                out.push_str(cell);
            }
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(header.to_vec(), false);
    for row in &rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect(), colors));
    }
    out
}

/// An optional value as a cell.
pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_their_widest_cell() {
        let text = render(
            &["NAME", "STATE"],
            &[
                vec!["a".into(), "running".into()],
                vec!["longer".into(), "stopped".into()],
            ],
        );
        assert_eq!(text, "NAME    STATE\na       running\nlonger  stopped");
    }

    #[test]
    fn colour_goes_around_state_cells_without_moving_columns() {
        let rows = [
            vec!["a".into(), "running".into(), "x".into()],
            vec!["b".into(), "stopped".into(), "y".into()],
        ];
        let plain = render_with(&["NAME", "STATE", "NOTE"], &rows, false);
        let painted = render_with(&["NAME", "STATE", "NOTE"], &rows, true);
        assert!(
            painted.contains("\u{1b}[32mrunning\u{1b}[0m  x"),
            "{painted}"
        );
        let stripped = painted
            .replace("\u{1b}[32m", "")
            .replace("\u{1b}[33m", "")
            .replace("\u{1b}[0m", "");
        assert_eq!(stripped, plain);
    }
}
